//! Times on the command line: `--nbf`, `--exp` and `clock set` take Unix seconds, an RFC 3339
//! time or date, or a move from the broker's now (`+1h`, `-30m`, `+90d`, `now`). Moves are
//! counted on the broker's clock, which may be a manual one far from the wall clock.

use super::error::{ArgError, CliError};
use super::session::Session;
use crate::grpc::proto;

/// A time as given: absolute, or relative to the broker's now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// Unix seconds.
    At(i64),
    /// This many seconds from the broker's now (negative: before it).
    FromNow(i64),
}

/// Reads a [`When`]: `now`; `+N`/`-N` with an optional unit s, m, h, d or w (`+90d`, `-30m`);
/// an RFC 3339 time or date (`2027-01-01T12:00:00Z`, `2027-01-01`); or Unix seconds (`1800000000`;
/// a sign without a unit is a move only after `+`, so `-5` stays Unix seconds).
pub fn parse_when(text: &str) -> Result<When, ArgError> {
    let t = text.trim();
    let bad = || ArgError::When(text.to_string());
    if t.eq_ignore_ascii_case("now") {
        return Ok(When::FromNow(0));
    }
    let digits_then_unit = |body: &str| {
        body.len() > 1
            && body.ends_with(|c: char| "smhdwSMHDW".contains(c))
            && body[..body.len() - 1].bytes().all(|b| b.is_ascii_digit())
    };
    if let Some(rest) = t.strip_prefix('+') {
        let move_by = rest.bytes().all(|b| b.is_ascii_digit()) || digits_then_unit(rest);
        return if move_by && !rest.is_empty() {
            super::emulation::parse_duration(rest).map(When::FromNow)
        } else {
            Err(bad())
        };
    }
    if t.strip_prefix('-').is_some_and(digits_then_unit) {
        return super::emulation::parse_duration(t).map(When::FromNow);
    }
    if let Ok(unix) = t.parse::<i64>() {
        return Ok(When::At(unix));
    }
    crate::model::time::parse_rfc3339(t).map(When::At).ok_or_else(bad)
}

impl When {
    /// Unix seconds: as given, or the broker's now (`GetClock`) moved by the offset.
    pub(crate) async fn resolve(self, s: &Session) -> Result<i64, CliError> {
        match self {
            When::At(unix) => Ok(unix),
            When::FromNow(offset) => {
                let now = s
                    .call(s.emulation().get_clock(proto::GetClockRequest {}))
                    .await
                    .map_err(|e| CliError::RelativeTime(Box::new(e)))?
                    .now;
                // Past i64's range the broker refuses the time anyway.
                Ok(now.saturating_add(offset))
            }
        }
    }
}

/// [`When::resolve`] for an optional time.
pub(crate) async fn resolve_opt(when: Option<When>, s: &Session) -> Result<Option<i64>, CliError> {
    match when {
        Some(w) => Ok(Some(w.resolve(s).await?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_unix_seconds_rfc3339_or_moves_from_now() {
        assert_eq!(parse_when("1800000000"), Ok(When::At(1_800_000_000)));
        assert_eq!(parse_when("-5"), Ok(When::At(-5)));
        assert_eq!(parse_when("2027-01-15T08:00:00Z"), Ok(When::At(1_800_000_000)));
        assert_eq!(parse_when("2027-01-15"), Ok(When::At(1_799_971_200)));
        assert_eq!(parse_when("now"), Ok(When::FromNow(0)));
        assert_eq!(parse_when("+1h"), Ok(When::FromNow(3_600)));
        assert_eq!(parse_when("+90d"), Ok(When::FromNow(90 * 86_400)));
        assert_eq!(parse_when("+30"), Ok(When::FromNow(30)));
        assert_eq!(parse_when("-30m"), Ok(When::FromNow(-1_800)));
        for bad in ["", "soon", "+1y", "2027-02-30", "1h", "+", "--1h", "+-1h"] {
            assert_eq!(parse_when(bad), Err(ArgError::When(bad.to_string())), "{bad:?}");
        }
    }
}
