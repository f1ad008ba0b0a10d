//! Key rotation policies (docs/RULES.md R1.12): ISO 8601 durations, the policy a key carries, its
//! validation with Key Vault's limits, and what a policy makes due at a given time. Pure: `now`
//! is an argument.

use serde::{Deserialize, Serialize};

const DAY: i64 = 86_400;
/// A month counts 30 days and a year 365 days (durations are fixed spans on the broker's clock).
const MONTH: i64 = 30 * DAY;
const YEAR: i64 = 365 * DAY;

/// Why a rotation policy (or one of its durations) was refused. Reported as `BadParameter`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RotationPolicyError {
    /// Not an ISO 8601 duration the broker reads.
    #[error(
        "The duration '{text}' is not a valid ISO 8601 duration: use P<n>Y, P<n>M, P<n>W, P<n>D and T<n>H, T<n>M, T<n>S parts in that order, e.g. P90D, P1Y6M, PT12H."
    )]
    InvalidDuration {
        /// The text as given (printable).
        text: String,
    },
    /// An action other than Rotate or Notify.
    #[error("The lifetime action type '{action}' is invalid. Valid types are Rotate and Notify.")]
    InvalidActionType {
        /// The action as given (printable).
        action: String,
    },
    /// A lifetime action with both times, or neither.
    #[error(
        "Invalid lifetime action trigger: set only one of the two times, timeAfterCreate or timeBeforeExpiry."
    )]
    OneTriggerTime,
    /// A Notify action triggered after creation.
    #[error("A Notify lifetime action is triggered by timeBeforeExpiry only.")]
    NotifyBeforeExpiryOnly,
    /// More than one Rotate action.
    #[error("A rotation policy can have only one Rotate lifetime action.")]
    MoreThanOneRotate,
    /// `expiryTime` under 28 days.
    #[error("The expiry time '{expiry}' is too short: the expiry time must be at least 28 days.")]
    ExpiryTooShort {
        /// The expiry time as given.
        expiry: String,
    },
    /// `timeAfterCreate` under 7 days.
    #[error("The rotation interval '{time}' is too short: the minimum is 7 days from creation.")]
    AfterCreateTooShort {
        /// The time as given.
        time: String,
    },
    /// `timeBeforeExpiry` under 7 days.
    #[error("The time before expiry '{time}' is too short: the minimum is 7 days from expiration.")]
    BeforeExpiryTooShort {
        /// The time as given.
        time: String,
    },
    /// A trigger that would fire later than 7 days before the version expires.
    #[error(
        "The trigger '{time}' does not fit the expiry time '{expiry}': it must fire at least 7 days after creation and at least 7 days before expiration."
    )]
    TriggerBeyondExpiry {
        /// The trigger's time as given.
        time: String,
        /// The expiry time as given.
        expiry: String,
    },
}

/// An ISO 8601 duration (`P90D`, `P1Y6M`, `PT12H`, `P1DT2H`), kept as written with its length in
/// seconds. Read strictly: upper-case designators in order, whole numbers, at least one part,
/// no fractions, no sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IsoDuration {
    text: String,
    seconds: i64,
}

impl IsoDuration {
    /// Parses a duration.
    pub fn parse(text: &str) -> Result<Self, RotationPolicyError> {
        let bad = || RotationPolicyError::InvalidDuration { text: super::ids::printable(text) };
        let rest = text.strip_prefix('P').ok_or_else(bad)?;
        let (date, time) = match rest.split_once('T') {
            Some((_, "")) => return Err(bad()),
            Some((d, t)) => (d, Some(t)),
            None => (rest, None),
        };
        let (mut seconds, mut parts) =
            sum_parts(date, &[(b'Y', YEAR), (b'M', MONTH), (b'W', 7 * DAY), (b'D', DAY)]).ok_or_else(bad)?;
        if let Some(t) = time {
            let (s, n) = sum_parts(t, &[(b'H', 3_600), (b'M', 60), (b'S', 1)]).ok_or_else(bad)?;
            if n == 0 {
                return Err(bad());
            }
            seconds = seconds.checked_add(s).ok_or_else(bad)?;
            parts += n;
        }
        if parts == 0 {
            return Err(bad());
        }
        Ok(IsoDuration { text: text.to_string(), seconds })
    }

    /// The length in seconds of the broker's clock.
    pub fn seconds(&self) -> i64 {
        self.seconds
    }

    /// The duration as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Sums `<digits><designator>` parts of `s`, designators in the order given, each at most once:
/// `(seconds, parts)`, or `None` for anything else (a stray character, a missing number, more
/// than 9 digits, an overflow).
fn sum_parts(s: &str, designators: &[(u8, i64)]) -> Option<(i64, usize)> {
    let (mut seconds, mut parts, mut next) = (0i64, 0usize, 0usize);
    let mut number: Option<i64> = None;
    let mut digits = 0;
    for c in s.bytes() {
        if c.is_ascii_digit() {
            digits += 1;
            if digits > 9 {
                return None;
            }
            number = Some(number.unwrap_or(0) * 10 + i64::from(c - b'0'));
            continue;
        }
        let pos = designators.get(next..)?.iter().position(|(d, _)| *d == c)? + next;
        let n = number.take()?;
        seconds = seconds.checked_add(n.checked_mul(designators[pos].1)?)?;
        parts += 1;
        next = pos + 1;
        digits = 0;
    }
    if number.is_some() { None } else { Some((seconds, parts)) }
}

impl TryFrom<String> for IsoDuration {
    type Error = RotationPolicyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        IsoDuration::parse(&s)
    }
}

impl From<IsoDuration> for String {
    fn from(d: IsoDuration) -> String {
        d.text
    }
}

/// What a lifetime action does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyAction {
    /// Create a new key version.
    Rotate,
    /// Tell the key's owner (the broker logs and counts it).
    Notify,
}

impl PolicyAction {
    /// The cloud's spelling.
    pub fn name(self) -> &'static str {
        match self {
            PolicyAction::Rotate => "Rotate",
            PolicyAction::Notify => "Notify",
        }
    }
}

/// When a lifetime action fires, relative to the newest version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    /// This long after the version was created.
    AfterCreate(IsoDuration),
    /// This long before the version expires (never for a version without `exp`).
    BeforeExpiry(IsoDuration),
}

/// One lifetime action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifetimeAction {
    /// What to do.
    pub action: PolicyAction,
    /// When.
    pub trigger: Trigger,
}

/// A key's rotation policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotationPolicy {
    /// Lifetime actions (at most one Rotate).
    pub lifetime_actions: Vec<LifetimeAction>,
    /// `exp` of a version the policy rotates in: its creation plus this.
    pub expiry_time: Option<IsoDuration>,
    /// When the policy was first set (Unix seconds; 0 for the default policy).
    pub created: i64,
    /// When it was last set.
    pub updated: i64,
}

/// A lifetime action as a request gives it: texts, empty = not set.
#[derive(Clone, Debug, Default)]
pub struct LifetimeActionSpec {
    /// `Rotate` or `Notify` (case-insensitive).
    pub action: String,
    /// ISO 8601 duration or empty.
    pub time_after_create: String,
    /// ISO 8601 duration or empty.
    pub time_before_expiry: String,
}

/// What a policy makes due for a key's newest version at a given time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// A Rotate action's time has come.
    pub rotate: bool,
    /// A Notify action's time has come.
    pub notify: bool,
}

impl KeyRotationPolicy {
    /// What a key without a policy answers: Key Vault's default, one Notify action 30 days
    /// before expiry and no expiry time.
    pub fn default_policy() -> Self {
        KeyRotationPolicy {
            lifetime_actions: vec![LifetimeAction {
                action: PolicyAction::Notify,
                trigger: Trigger::BeforeExpiry(IsoDuration { text: "P30D".into(), seconds: 30 * DAY }),
            }],
            expiry_time: None,
            created: 0,
            updated: 0,
        }
    }

    /// Builds and validates a policy from a request's texts; `created`/`updated` are set by the
    /// caller. Checks, in order: the expiry time (a duration of at least 28 days), then each
    /// action (its type, one of the two times, the durations, Notify before expiry only, at least
    /// 7 days from creation / from expiration, inside the expiry time), then one Rotate at most.
    pub fn from_spec(expiry_time: &str, actions: &[LifetimeActionSpec]) -> Result<Self, RotationPolicyError> {
        let expiry_time = match expiry_time.trim() {
            "" => None,
            t => {
                let d = IsoDuration::parse(t)?;
                if d.seconds < 28 * DAY {
                    return Err(RotationPolicyError::ExpiryTooShort { expiry: d.text });
                }
                Some(d)
            }
        };
        let mut lifetime_actions = Vec::with_capacity(actions.len());
        for a in actions {
            let action = match a.action.trim() {
                s if s.eq_ignore_ascii_case("Rotate") => PolicyAction::Rotate,
                s if s.eq_ignore_ascii_case("Notify") => PolicyAction::Notify,
                other => {
                    return Err(RotationPolicyError::InvalidActionType {
                        action: super::ids::printable(other),
                    });
                }
            };
            let trigger = match (a.time_after_create.trim(), a.time_before_expiry.trim()) {
                (t, "") if !t.is_empty() => {
                    let d = IsoDuration::parse(t)?;
                    if action == PolicyAction::Notify {
                        return Err(RotationPolicyError::NotifyBeforeExpiryOnly);
                    }
                    if d.seconds < 7 * DAY {
                        return Err(RotationPolicyError::AfterCreateTooShort { time: d.text });
                    }
                    Trigger::AfterCreate(d)
                }
                ("", t) if !t.is_empty() => {
                    let d = IsoDuration::parse(t)?;
                    if d.seconds < 7 * DAY {
                        return Err(RotationPolicyError::BeforeExpiryTooShort { time: d.text });
                    }
                    Trigger::BeforeExpiry(d)
                }
                _ => return Err(RotationPolicyError::OneTriggerTime),
            };
            if let Some(exp) = &expiry_time {
                let (Trigger::AfterCreate(d) | Trigger::BeforeExpiry(d)) = &trigger;
                if d.seconds > exp.seconds - 7 * DAY {
                    return Err(RotationPolicyError::TriggerBeyondExpiry {
                        time: d.text.clone(),
                        expiry: exp.text.clone(),
                    });
                }
            }
            lifetime_actions.push(LifetimeAction { action, trigger });
        }
        if lifetime_actions.iter().filter(|a| a.action == PolicyAction::Rotate).count() > 1 {
            return Err(RotationPolicyError::MoreThanOneRotate);
        }
        Ok(KeyRotationPolicy { lifetime_actions, expiry_time, created: 0, updated: 0 })
    }

    /// The `exp` of a version the policy creates at `now`.
    pub fn expiry_from(&self, now: i64) -> Option<i64> {
        self.expiry_time.as_ref().map(|d| now.saturating_add(d.seconds))
    }

    /// What is due at `now` for the newest version, created at `created` and expiring at `exp`.
    pub fn due(&self, created: i64, exp: Option<i64>, now: i64) -> Due {
        let mut due = Due::default();
        for a in &self.lifetime_actions {
            let at = match &a.trigger {
                Trigger::AfterCreate(d) => Some(created.saturating_add(d.seconds)),
                Trigger::BeforeExpiry(d) => exp.map(|e| e.saturating_sub(d.seconds)),
            };
            if at.is_some_and(|at| now >= at) {
                match a.action {
                    PolicyAction::Rotate => due.rotate = true,
                    PolicyAction::Notify => due.notify = true,
                }
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(text: &str) -> Result<i64, RotationPolicyError> {
        IsoDuration::parse(text).map(|d| d.seconds())
    }

    #[test]
    fn durations_parse_each_designator() {
        assert_eq!(secs("P90D"), Ok(90 * DAY));
        assert_eq!(secs("P3M"), Ok(90 * DAY));
        assert_eq!(secs("P1Y"), Ok(365 * DAY));
        assert_eq!(secs("P2W"), Ok(14 * DAY));
        assert_eq!(secs("PT48H"), Ok(48 * 3_600));
        assert_eq!(secs("PT30M"), Ok(1_800));
        assert_eq!(secs("PT15S"), Ok(15));
        assert_eq!(secs("P1Y2M3DT4H5M6S"), Ok(YEAR + 2 * MONTH + 3 * DAY + 4 * 3_600 + 5 * 60 + 6));
        assert_eq!(IsoDuration::parse("P1DT2H").map(|d| d.as_str().to_string()), Ok("P1DT2H".into()));
    }

    #[test]
    fn durations_are_read_strictly() {
        for bad in [
            "",
            "P",
            "PT",
            "P1DT",
            "90D",
            "p90d",
            "P90d",
            "P-1D",
            "P1.5D",
            "PD",
            "P1D1Y",
            "P1H",
            "PT1D",
            "P1M1M",
            "P 1D",
            "P1D ",
            "P9999999999D",
            "P1DX",
        ] {
            assert!(
                matches!(IsoDuration::parse(bad), Err(RotationPolicyError::InvalidDuration { .. })),
                "{bad:?}"
            );
        }
    }

    fn spec(action: &str, after: &str, before: &str) -> LifetimeActionSpec {
        LifetimeActionSpec {
            action: action.into(),
            time_after_create: after.into(),
            time_before_expiry: before.into(),
        }
    }

    #[test]
    fn policies_are_validated_with_key_vaults_limits() {
        use RotationPolicyError::*;
        let check = |exp: &str, actions: &[LifetimeActionSpec]| KeyRotationPolicy::from_spec(exp, actions);
        assert!(check("P90D", &[spec("Rotate", "P30D", ""), spec("Notify", "", "P30D")]).is_ok());
        assert!(check("", &[]).is_ok());
        assert!(matches!(check("P27D", &[]), Err(ExpiryTooShort { .. })));
        assert!(check("P28D", &[]).is_ok());
        assert_eq!(check("", &[spec("Rotate", "P30D", "P7D")]), Err(OneTriggerTime));
        assert_eq!(check("", &[spec("Rotate", "", "")]), Err(OneTriggerTime));
        assert!(matches!(check("", &[spec("Rotate", "P6D", "")]), Err(AfterCreateTooShort { .. })));
        assert!(check("", &[spec("Rotate", "P7D", "")]).is_ok());
        assert!(matches!(check("", &[spec("Rotate", "", "P6D")]), Err(BeforeExpiryTooShort { .. })));
        assert_eq!(check("", &[spec("Notify", "P30D", "")]), Err(NotifyBeforeExpiryOnly));
        assert!(matches!(check("", &[spec("Delete", "P30D", "")]), Err(InvalidActionType { .. })));
        assert_eq!(
            check("", &[spec("Rotate", "P30D", ""), spec("rotate", "", "P10D")]),
            Err(MoreThanOneRotate)
        );
        assert!(matches!(check("P90D", &[spec("Rotate", "P84D", "")]), Err(TriggerBeyondExpiry { .. })));
        assert!(check("P90D", &[spec("Rotate", "P83D", "")]).is_ok());
        assert!(matches!(check("P90X", &[]), Err(InvalidDuration { .. })));
    }

    #[test]
    fn the_default_policy_notifies_30_days_before_expiry() {
        let p = KeyRotationPolicy::default_policy();
        assert_eq!(p.expiry_time, None);
        assert_eq!(p.due(0, Some(100 * DAY), 69 * DAY), Due::default());
        assert_eq!(p.due(0, Some(100 * DAY), 70 * DAY), Due { rotate: false, notify: true });
        assert_eq!(p.due(0, None, 1_000 * DAY), Due::default());
    }

    #[test]
    fn rotate_is_due_after_creation_or_before_expiry() {
        let after = KeyRotationPolicy::from_spec("P90D", &[spec("Rotate", "P30D", "")]).unwrap();
        assert!(!after.due(10, None, 10 + 30 * DAY - 1).rotate);
        assert!(after.due(10, None, 10 + 30 * DAY).rotate);
        assert_eq!(after.expiry_from(5), Some(5 + 90 * DAY));
        let before = KeyRotationPolicy::from_spec("", &[spec("Rotate", "", "P7D")]).unwrap();
        assert!(!before.due(0, None, 1_000 * DAY).rotate, "a version without exp never expires");
        assert!(before.due(0, Some(50 * DAY), 43 * DAY).rotate);
        assert!(!before.due(0, Some(50 * DAY), 43 * DAY - 1).rotate);
    }
}
