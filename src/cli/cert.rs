//! `cert …`: mTLS client certificates signed by the dev CA of `serve --tls auto`, issued
//! locally beside the broker on its data directory (no broker call).

use std::path::{Path, PathBuf};

use super::error::CliError;

/// `tde-broker cert …`
#[derive(Debug, clap::Subcommand)]
pub enum CertCmd {
    /// Issue a client certificate that authenticates as a principal (SAN URI
    /// spiffe://tdebroker/principal/<GUID>), signed by the dev CA in <data-dir>/tls; writes
    /// <GUID>.pem and <GUID>.key (0600).
    Issue {
        /// Object id (GUID) of the principal the certificate authenticates as.
        #[arg(long, value_name = "GUID")]
        principal: String,
        /// Where to write the certificate and key [default: the current directory].
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// Runs `cert …` on `data_dir` (it reads the dev CA's files) [default: the broker's default].
pub(super) fn run(data_dir: Option<&Path>, cmd: CertCmd) -> Result<(), CliError> {
    match cmd {
        CertCmd::Issue { principal, out_dir } => {
            let data_dir = data_dir.unwrap_or(Path::new(crate::config::DEFAULT_DATA_DIR));
            let (cert, key) = crate::tls::issue_client_cert(data_dir, &principal)?;
            // The file names carry the id as the certificate does (lowercase, hyphenated).
            let oid = uuid::Uuid::parse_str(principal.trim()).map_err(CliError::BadPrincipal)?.to_string();
            print!("{}", write_pair(out_dir, &oid, &cert, &key)?);
            Ok(())
        }
    }
}

/// Where a client certificate and its key were written.
pub(super) struct CertFiles {
    /// `<oid>.pem`.
    pub(super) cert: PathBuf,
    /// `<oid>.key` (0600).
    pub(super) key: PathBuf,
}

impl std::fmt::Display for CertFiles {
    /// One `certificate` and one `key` line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "certificate  {}", self.cert.display())?;
        writeln!(f, "key          {}", self.key.display())
    }
}

/// Writes a client certificate and its key as `<oid>.pem` and `<oid>.key` (0600) in `out_dir`
/// [default: the current directory].
pub(super) fn write_pair(
    out_dir: Option<PathBuf>,
    oid: &str,
    cert: &str,
    key: &str,
) -> Result<CertFiles, CliError> {
    let out_dir = out_dir.unwrap_or_else(|| PathBuf::from("."));
    let files =
        CertFiles { cert: out_dir.join(format!("{oid}.pem")), key: out_dir.join(format!("{oid}.key")) };
    crate::tls::write_file(&files.key, key.as_bytes(), 0o600)?;
    crate::tls::write_file(&files.cert, cert.as_bytes(), 0o644)?;
    Ok(files)
}
