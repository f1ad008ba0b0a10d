//! The subset of HashiCorp Vault's HTTP API (KV version 2) that MariaDB's
//! `hashicorp_key_management` plugin uses, backed by the TDE model.
