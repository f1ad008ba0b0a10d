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
            let out_dir = out_dir.unwrap_or_else(|| PathBuf::from("."));
            // The file names carry the id as the certificate does (lowercase, hyphenated).
            let oid = uuid::Uuid::parse_str(principal.trim()).map_err(CliError::BadPrincipal)?.to_string();
            let cert_path = out_dir.join(format!("{oid}.pem"));
            let key_path = out_dir.join(format!("{oid}.key"));
            crate::tls::write_file(&key_path, key.as_bytes(), 0o600)?;
            crate::tls::write_file(&cert_path, cert.as_bytes(), 0o644)?;
            println!("certificate  {}", cert_path.display());
            println!("key          {}", key_path.display());
            Ok(())
        }
    }
}
