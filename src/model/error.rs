//! The broker's typed errors. Each variant's `Display` is the cloud's text (docs/RULES.md, Cloud
//! behaviour: "key errors", "permissions", "network", "tokens", "throttling" below);
//! [`BrokerError::code`] is the cloud's code (the inner code where the cloud has one) and
//! [`BrokerError::class`] decides the gRPC status at the edge.

use std::fmt;

/// The Key Vault link the cloud appends to key-not-found errors.
const KEY_NOT_FOUND_HELP: &str = "https://go.microsoft.com/fwlink/?linkid=2125182";
/// The Key Vault link the cloud appends to access-policy denials.
const ACCESS_DENIED_HELP: &str = "https://go.microsoft.com/fwlink/?linkid=2125287";

/// How an error is reported on the wire; the edge maps each class to one gRPC status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// 401: missing, forged, expired or misdirected credentials.
    Unauthenticated,
    /// 403: permissions, disabled keys, key_ops, expired-key wrap, purge protection.
    Forbidden,
    /// 404.
    NotFound,
    /// 409 on a name that is taken.
    AlreadyExists,
    /// 409 on a state that forbids the operation (deleted-but-recoverable names, validations).
    FailedPrecondition,
    /// 400.
    InvalidArgument,
    /// 503: the store or the broker itself failed.
    Unavailable,
    /// 429: the vault's throttling limits.
    ResourceExhausted,
    /// 500: a bug (the message says nothing more), or a damaged store: not worth retrying.
    Internal,
}

/// How the caller appears in the cloud's denial texts: `appid=…;oid=…;iss=…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerDescription {
    /// Application (client) id of the caller.
    pub app_id: String,
    /// Object (principal) id of the caller.
    pub object_id: String,
    /// Token issuer, `https://sts.windows.net/{tenant}/`.
    pub issuer: String,
}

impl fmt::Display for CallerDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "appid={};oid={};iss={}", self.app_id, self.object_id, self.issuer)
    }
}

/// Every failure the broker reports to a caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// No `authorization` metadata at all (tokens).
    #[error("Request is missing a Bearer or PoP token.")]
    MissingToken,
    /// The token could not be parsed or its signature does not verify.
    #[error("Error validating token: {reason}")]
    InvalidToken {
        /// What was wrong, without echoing the token.
        reason: String,
    },
    /// The token's lifetime ended before the broker's clock (IDX10223).
    #[error(
        "Error validating token: IDX10223: Lifetime validation failed. The token is expired. ValidTo: '{expires}', Current time: '{now}'."
    )]
    TokenExpired {
        /// `exp` of the token.
        expires: i64,
        /// The broker's clock.
        now: i64,
    },
    /// The token's `nbf` is in the future (IDX10222).
    #[error(
        "Error validating token: IDX10222: Lifetime validation failed. The token is not yet valid. ValidFrom: '{not_before}', Current time: '{now}'."
    )]
    TokenNotYetValid {
        /// `nbf` of the token.
        not_before: i64,
        /// The broker's clock.
        now: i64,
    },
    /// AKV10022: wrong audience for the plane being called.
    #[error("AKV10022: Invalid audience. Expected {expected}, found: {found}.")]
    InvalidAudience {
        /// The audience this plane accepts.
        expected: String,
        /// The token's audience(s).
        found: String,
    },
    /// AKV10032: token from another tenant or issuer.
    #[error("AKV10032: Invalid issuer. Expected one of {expected}, found {found}.")]
    InvalidIssuer {
        /// The broker's issuer.
        expected: String,
        /// The token's issuer.
        found: String,
    },
    /// The token is valid but its principal no longer exists.
    #[error("Error validating token: the principal '{object_id}' no longer exists.")]
    PrincipalDeleted {
        /// The token's `oid`.
        object_id: String,
    },
    /// A control-plane action the caller holds no role for (ARM's `AuthorizationFailed`).
    #[error(
        "The client '{object_id}' with object id '{object_id}' does not have authorization to perform action '{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please refresh your credentials."
    )]
    AuthorizationFailed {
        /// The caller's object id.
        object_id: String,
        /// The ARM action, e.g. `Microsoft.KeyVault/vaults/write`.
        action: String,
        /// The resource scope.
        scope: String,
    },
    /// Access-policy denial on the data plane (permissions), inner code `AccessDenied`.
    #[error(
        "The user, group or application '{caller}' does not have keys {permission} permission on key vault '{vault};location={location}'. For help resolving this issue, please see {ACCESS_DENIED_HELP}"
    )]
    AccessDenied {
        /// Who called (boxed: keeps `Result<_, BrokerError>` small on the hot path).
        caller: Box<CallerDescription>,
        /// The key permission that was missing, as the cloud spells it (`get`, `unwrapKey`, …).
        permission: &'static str,
        /// The vault name.
        vault: String,
        /// The broker's configured location.
        location: String,
    },
    /// RBAC denial on the data plane (permissions), inner code `ForbiddenByRbac`.
    #[error(
        "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: {caller}\r\nAction: '{action}'\r\nResource: '{resource}'\r\nAssignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: 'DeniedWithNoValidRBAC' \r\nVault: {vault};location={location}\r\n"
    )]
    ForbiddenByRbac {
        /// Who called (boxed: keeps `Result<_, BrokerError>` small on the hot path).
        caller: Box<CallerDescription>,
        /// The data action, e.g. `Microsoft.KeyVault/vaults/keys/unwrap/action`.
        action: &'static str,
        /// The lower-cased ARM resource path of the key.
        resource: String,
        /// The vault name.
        vault: String,
        /// The broker's configured location.
        location: String,
    },
    /// The vault firewall refused the caller's address (network), inner code `ForbiddenByFirewall`.
    #[error(
        "Client address is not authorized and caller is not a trusted service.\r\nClient address: {client}\r\nCaller: {caller}\r\nVault: {vault};location={location}"
    )]
    ForbiddenByFirewall {
        /// The client address as seen by the broker.
        client: String,
        /// Who called.
        caller: Box<CallerDescription>,
        /// Vault name.
        vault: String,
        /// Location.
        location: String,
    },
    /// Public network access is disabled (network), inner code `ForbiddenByConnection`.
    #[error(
        "Public network access is disabled and request is not from a trusted service nor via an approved private link.\r\nCaller: {caller}\r\nVault: {vault};location={location}"
    )]
    ForbiddenByConnection {
        /// Who called.
        caller: Box<CallerDescription>,
        /// Vault name.
        vault: String,
        /// Location.
        location: String,
    },
    /// `enabled = false` refuses every crypto operation (key errors), inner code `KeyDisabled`.
    #[error("Operation {operation} is not allowed on a disabled key.")]
    KeyDisabled {
        /// The operation name as the cloud spells it.
        operation: &'static str,
    },
    /// The operation is not in the version's `key_ops` (key errors), inner code
    /// `KeyOperationForbidden`.
    #[error("Operation {operation} is not permitted on this key.")]
    KeyOperationForbidden {
        /// The operation name as the cloud spells it.
        operation: &'static str,
    },
    /// encrypt/wrapKey after `exp` (key errors: 403; the cloud's exact body is not public).
    #[error("Operation {operation} is not allowed on an expired key.")]
    KeyExpired {
        /// The operation name as the cloud spells it.
        operation: &'static str,
    },
    /// encrypt/wrapKey before `nbf` (key errors: 403; the cloud's exact body is not public).
    #[error("Operation {operation} is not allowed on a key that is not yet valid.")]
    KeyNotYetValid {
        /// The operation name as the cloud spells it.
        operation: &'static str,
    },
    /// Missing key or key version (key errors), code `KeyNotFound`.
    #[error(
        "A key with (name/id) {name_or_id} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see {KEY_NOT_FOUND_HELP}"
    )]
    KeyNotFound {
        /// `name` or `name/version`, as the cloud prints it.
        name_or_id: String,
    },
    /// GetDeletedKey/Recover/Purge on a key that is not soft-deleted.
    #[error("Deleted Key not found: {name}")]
    DeletedKeyNotFound {
        /// The key name.
        name: String,
    },
    /// The name belongs to a soft-deleted key (key errors), inner code
    /// `ObjectIsDeletedButRecoverable`.
    #[error(
        "Key {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the key can only be recovered or purged."
    )]
    KeyDeletedButRecoverable {
        /// The key name.
        name: String,
    },
    /// Purge refused while purge protection is on (key errors).
    #[error(
        "Operation \"purge\" is not allowed because purge protection is enabled for this vault. Key Vault service will automatically purge it after the retention period has passed."
    )]
    PurgeProtected,
    /// RestoreKey into a vault where the name is taken.
    #[error("There was a conflict restoring the key '{name}'. The key already exists in this vault.")]
    KeyAlreadyExists {
        /// The key name.
        name: String,
    },
    /// A vault that does not exist.
    #[error("The Resource 'Microsoft.KeyVault/vaults/{name}' was not found.")]
    VaultNotFound {
        /// The vault name.
        name: String,
    },
    /// CreateVault with a name already in use.
    #[error(
        "The vault name '{name}' is already in use. Vault names are globally unique so it is possible that the name is already taken."
    )]
    VaultAlreadyExists {
        /// The vault name.
        name: String,
    },
    /// CreateVault with the name of a soft-deleted vault (409, code `ConflictError`). The text is
    /// not in Key Vault's reference documentation; it is the one public reports of ARM's answer
    /// quote (e.g. Azure/azure-dev issue #1431).
    #[error(
        "A vault with the same name already exists in deleted state. You need to either recover or purge existing key vault. Follow this link https://go.microsoft.com/fwlink/?linkid=2149745 for more information on soft delete."
    )]
    VaultDeletedButRecoverable {
        /// The vault name.
        name: String,
    },
    /// GetDeletedVault/RecoverDeletedVault/PurgeDeletedVault on a name that is no soft-deleted
    /// vault. The cloud's exact text is not documented: this is ARM's `ResourceNotFound` wording
    /// for the deleted-vault resource type.
    #[error("The Resource 'Microsoft.KeyVault/locations/deletedVaults/{name}' was not found.")]
    DeletedVaultNotFound {
        /// The vault name.
        name: String,
    },
    /// Purge protection can only be turned on.
    #[error(
        "The property \"enablePurgeProtection\" cannot be set to false. Enabling the purge protection for a vault is an irreversible action."
    )]
    PurgeProtectionIrreversible,
    /// A managed identity that does not exist (ARM's `ResourceNotFound`).
    #[error("The Resource 'Microsoft.ManagedIdentity/userAssignedIdentities/{name}' was not found.")]
    IdentityNotFound {
        /// The identity's name, or the id the caller gave.
        name: String,
    },
    /// A role assignment or policy names a principal the directory does not hold.
    #[error("Principal {principal_id} does not exist in the directory {tenant_id}.")]
    PrincipalNotFound {
        /// The object id given.
        principal_id: String,
        /// The tenant.
        tenant_id: String,
    },
    /// The same principal already holds the same role at the same scope.
    #[error("The role assignment already exists.")]
    RoleAssignmentExists,
    /// DeleteRoleAssignment with an unknown id.
    #[error("The role assignment '{id}' is not found.")]
    RoleAssignmentNotFound {
        /// The id given.
        id: String,
    },
    /// TDE protector in a vault without soft delete and purge protection.
    #[error("The provided Key Vault uri is not valid.")]
    TdeVaultRecoveryLevel,
    /// TDE protector that is not RSA/RSA-HSM 2048 or 3072.
    #[error(
        "The provided key vault uses unsupported RSA Key Size or Key Type. The supported RSA key size is 2048 or 3072 and Key Type is RSA or RSA-HSM."
    )]
    TdeKeyNotSupported,
    /// TDE protector that is disabled.
    #[error(
        "The key '{key}' is disabled in Azure Key Vault. The key must be in the Enabled state to be used as the TDE protector."
    )]
    TdeKeyDisabled {
        /// Key URI.
        key: String,
    },
    /// TDE protector outside its activation/expiry window.
    #[error(
        "The key '{key}' cannot be used as the TDE protector: its activation date (if set) must be in the past and its expiration date (if set) in the future."
    )]
    TdeKeyInvalidDates {
        /// Key URI.
        key: String,
    },
    /// TDE protector that does not exist in the vault.
    #[error("The key '{key}' was not found in Azure Key Vault.")]
    TdeKeyNotFound {
        /// Key URI.
        key: String,
    },
    /// A managed instance with a user-assigned identity needs a vault open to all networks (seed).
    #[error(
        "User Assigned Managed Identity for SQL Managed Instance is currently only supported on key vaults that have public access from all networks enabled. The key vault '{vault}' filters networks or uses private endpoints."
    )]
    TdeManagedInstanceUmiNeedsOpenVault {
        /// Vault name.
        vault: String,
    },
    /// The effective identity cannot use the key: the seed's message, word for word.
    #[error(
        "Failed to save Transparent Data Encryption settings for SQL resource: {server}. Error message: The managed identity with ID '{identity}' requires the following Azure Key Vault permissions: 'Get, WrapKey, UnwrapKey' to the key '{key}'. Please grant the missing permissions to the identity. Additionally ensure the key is not expired and is not disabled. For expired key, please extend the key expiry time so that SQL can use it to perform wrap and unwrap operations. If your key vault is behind a virtual network or firewall, ensure you select the 'Allow trusted Microsoft services to bypass this firewall' option. ({link})."
    )]
    TdeIdentityMissingPermissions {
        /// Server name.
        server: String,
        /// The identity (UMI resource id or SMI principal id).
        identity: String,
        /// Key URI (without version).
        key: String,
        /// Documentation link of the configured cloud.
        link: &'static str,
    },
    /// A new primary UMI that cannot use the protector.
    #[error(
        "PrimaryUserAssignedIdentityId provided by user does not have access to KeyId provided. The identity '{identity}' needs 'Get, WrapKey, UnwrapKey' on '{key}' before it can become primary."
    )]
    TdeUmiMissingPermissions {
        /// The identity.
        identity: String,
        /// Key URI.
        key: String,
    },
    /// Removing every UMI would fall back to an SMI that cannot use the protector (or none).
    #[error(
        "Removing all user-assigned identities from server '{server}' would make TDE use {fallback}, which cannot use the key '{key}'. Grant the system-assigned identity 'Get, WrapKey, UnwrapKey' on the key (or keep a user-assigned identity) first."
    )]
    TdeFallbackIdentityMissingPermissions {
        /// Server name.
        server: String,
        /// What TDE would fall back to.
        fallback: String,
        /// Key URI.
        key: String,
    },
    /// TDE with CMK without any identity.
    #[error(
        "Server '{server}' has no identity to reach Azure Key Vault: assign a user-assigned identity (primary) or turn on the system-assigned identity. A customer-managed key at server creation needs a user-assigned identity."
    )]
    TdeNoServerIdentity {
        /// Server name.
        server: String,
    },
    /// Deleting a UMI that servers use for TDE, without `force`.
    #[error(
        "The user-assigned identity '{identity}' is the key vault identity of: {dependants}. Deleting it makes their databases inaccessible; repeat with force to delete it anyway."
    )]
    IdentityInUse {
        /// The identity.
        identity: String,
        /// Comma-separated server ids.
        dependants: String,
    },
    /// A server that does not exist.
    #[error("The requested resource of type 'Microsoft.Sql/servers' with name '{name}' was not found.")]
    ServerNotFound {
        /// Name or id.
        name: String,
    },
    /// CreateServer with a name in use.
    #[error("The server name '{name}' already exists. Choose a different name.")]
    ServerAlreadyExists {
        /// Name.
        name: String,
    },
    /// A database that does not exist.
    #[error(
        "The requested resource of type 'Microsoft.Sql/servers/databases' with name '{name}' was not found."
    )]
    DatabaseNotFound {
        /// Name.
        name: String,
    },
    /// CreateDatabase with a name in use.
    #[error("Database '{name}' already exists. Choose a different database name.")]
    DatabaseAlreadyExists {
        /// Name.
        name: String,
    },
    /// An engine call on an inaccessible database (SQL error 40613's text).
    #[error(
        "Database '{database}' on server '{server}' is not currently available. Please retry the connection later. (Inaccessible: {reason})"
    )]
    DatabaseInaccessible {
        /// Database.
        database: String,
        /// Server name.
        server: String,
        /// The reason code.
        reason: &'static str,
    },
    /// A TdeEngine call by a principal that is no server's engine host.
    #[error(
        "The caller '{object_id}' is not the engine host of a server; TdeEngine is called with a host credential (Servers.IssueHostCredential)."
    )]
    NotAServerHost {
        /// The caller.
        object_id: String,
    },
    /// The built-in policy "SQL server should use customer-managed keys" in Deny mode.
    #[error(
        "Resource '{server}' was disallowed by policy. Policy identifiers: '[{{\"policyAssignment\":{{\"name\":\"SQL server should use customer-managed keys to encrypt data at rest\"}},\"policyDefinition\":{{\"name\":\"0a370ff3-6cab-4e85-8995-295fd854c5b8\"}}}}]'."
    )]
    DisallowedByPolicy {
        /// Server name.
        server: String,
    },
    /// Service-managed TDE while a CMK database is inaccessible (troubleshoot-tde).
    #[error(
        "The TDE protector of server '{server}' cannot be changed to service-managed while a database is inaccessible; restore key access and revalidate first."
    )]
    InaccessibleDatabaseBlocksChange {
        /// Server name.
        server: String,
    },
    /// A key rotation policy Key Vault would refuse (code `BadParameter`).
    #[error("{0}")]
    InvalidRotationPolicy(super::rotation::RotationPolicyError),
    /// A request field with a bad value (code `BadParameter`).
    #[error("{message}")]
    BadParameter {
        /// What was wrong and what is accepted.
        message: String,
    },
    /// Any RSA/AES unwrap or decrypt failure: one identical answer, so no padding oracle.
    #[error("The ciphertext could not be decrypted with this key and algorithm.")]
    DecryptionFailed,
    /// AdvanceClock/SetClock on the system clock.
    #[error("The broker runs on the system clock; start it with --clock manual to move time.")]
    ClockNotManual,
    /// An injected outage of a vault (Emulation.SetFaults): a transient "5xx".
    #[error("The service is temporarily unavailable. Vault '{vault}' is in an injected outage; retry later.")]
    VaultUnavailable {
        /// Vault name.
        vault: String,
    },
    /// The vault's throttling limit of the current 10-second window is used up (throttling: the
    /// cloud's 429 body).
    #[error(
        "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached"
    )]
    Throttled {
        /// Seconds until the window ends (the `retry-after` metadata; the cloud sends none).
        retry_after: u32,
    },
    /// An injected PERMISSION_DENIED (Emulation.SetFaults `error_code`).
    #[error("Access to vault '{vault}' was denied by an injected fault (Emulation.SetFaults).")]
    InjectedForbidden {
        /// Vault name.
        vault: String,
    },
    /// The store could not commit or read; the change was not made.
    #[error("The broker could not reach its store; the request was not carried out. Retry later.")]
    StoreUnavailable,
    /// Another broker sharing the store committed a change while this one was preparing its
    /// own; nothing was written. The broker has caught up: retrying decides again on fresh state.
    #[error(
        "Another broker changed the same state at the same time; the request was not carried out. Retry it."
    )]
    ConcurrentChange,
    /// This broker has not heard from the store it shares with other brokers for longer than its
    /// staleness bound, so it may not know of a revocation: it refuses data-plane calls until it
    /// has caught up.
    #[error(
        "This broker has lost contact with its shared store for longer than {bound_ms} ms and may not know of recent changes (a revoked permission, a disabled key); it refuses data-plane requests until it has caught up. Retry later or call another broker."
    )]
    BrokerStale {
        /// The configured staleness bound, milliseconds.
        bound_ms: u64,
    },
    /// The store reported that its data is damaged (SQLite's corruption, a file that is not a
    /// database); the change was not made, and retrying cannot help.
    #[error(
        "The broker's store is damaged; the request was not carried out and retrying will not help. An operator must restore the store from a backup (the broker's log names the damage)."
    )]
    StoreCorrupt,
    /// The file system that holds the store is out of space; the change was not made. Retrying
    /// succeeds once space has been freed.
    #[error(
        "The broker's store is out of disk space; the request was not carried out. Retry once space has been freed on the file system that holds the broker's data directory."
    )]
    StoreFull,
    /// A bug or an inconsistency; details are logged, never returned.
    #[error("An internal error occurred.")]
    Internal,
}

impl BrokerError {
    /// Shorthand for [`BrokerError::BadParameter`].
    pub fn bad_parameter(message: impl Into<String>) -> Self {
        BrokerError::BadParameter { message: message.into() }
    }

    /// The cloud's code (its inner code where it has one), carried as `ErrorInfo.reason`.
    pub fn code(&self) -> &'static str {
        use BrokerError::*;
        match self {
            MissingToken | InvalidToken { .. } | TokenExpired { .. } | TokenNotYetValid { .. } => {
                "Unauthorized"
            }
            PrincipalDeleted { .. } => "Unauthorized",
            InvalidAudience { .. } => "AKV10022",
            InvalidIssuer { .. } => "AKV10032",
            AuthorizationFailed { .. } => "AuthorizationFailed",
            AccessDenied { .. } => "AccessDenied",
            ForbiddenByRbac { .. } => "ForbiddenByRbac",
            ForbiddenByFirewall { .. } => "ForbiddenByFirewall",
            ForbiddenByConnection { .. } => "ForbiddenByConnection",
            KeyDisabled { .. } => "KeyDisabled",
            KeyOperationForbidden { .. } => "KeyOperationForbidden",
            KeyExpired { .. } => "KeyExpired",
            KeyNotYetValid { .. } => "KeyNotYetValid",
            KeyNotFound { .. } | DeletedKeyNotFound { .. } => "KeyNotFound",
            KeyDeletedButRecoverable { .. } => "ObjectIsDeletedButRecoverable",
            PurgeProtected => "Forbidden",
            KeyAlreadyExists { .. } => "Conflict",
            VaultNotFound { .. } | IdentityNotFound { .. } => "ResourceNotFound",
            PrincipalNotFound { .. } => "PrincipalNotFound",
            TdeVaultRecoveryLevel => "SecurityInvalidAzureKeyVaultRecoveryLevel",
            TdeKeyNotSupported => "AzureKeyVaultRsaKeyNotSupported",
            TdeKeyDisabled { .. } => "AzureKeyVaultKeyDisabled",
            TdeKeyInvalidDates { .. } => "AzureKeyVaultInvalidExpirationDate",
            TdeKeyNotFound { .. } => "AzureKeyVaultKeyNameNotFound",
            TdeManagedInstanceUmiNeedsOpenVault { .. } => "AzureKeyVaultUmiNotSupportedWithFirewall",
            TdeIdentityMissingPermissions { .. } => "AzureKeyVaultMissingPermissions",
            TdeUmiMissingPermissions { .. } => "UmiMissingAkvPermissions",
            TdeFallbackIdentityMissingPermissions { .. } => "AzureKeyVaultMissingPermissions",
            TdeNoServerIdentity { .. } => "AzureKeyVaultNoServerIdentity",
            IdentityInUse { .. } => "IdentityInUse",
            ServerNotFound { .. } | DatabaseNotFound { .. } => "ResourceNotFound",
            ServerAlreadyExists { .. } => "ServerAlreadyExists",
            DatabaseAlreadyExists { .. } => "DatabaseAlreadyExists",
            DatabaseInaccessible { .. } => "DatabaseInaccessible",
            NotAServerHost { .. } => "NotAServerHost",
            DisallowedByPolicy { .. } => "RequestDisallowedByPolicy",
            InaccessibleDatabaseBlocksChange { .. } => "InaccessibleDatabaseBlocksChange",
            RoleAssignmentExists => "RoleAssignmentExists",
            RoleAssignmentNotFound { .. } => "RoleAssignmentNotFound",
            VaultAlreadyExists { .. } => "VaultAlreadyExists",
            VaultDeletedButRecoverable { .. } => "ConflictError",
            DeletedVaultNotFound { .. } => "ResourceNotFound",
            PurgeProtectionIrreversible => "BadRequest",
            BadParameter { .. } | InvalidRotationPolicy(_) | DecryptionFailed => "BadParameter",
            ClockNotManual => "ClockNotManual",
            StoreUnavailable | VaultUnavailable { .. } => "ServiceUnavailable",
            ConcurrentChange => "ConcurrentChange",
            BrokerStale { .. } => "BrokerStale",
            StoreCorrupt => "StoreCorrupt",
            StoreFull => "StoreFull",
            Throttled { .. } => "Throttled",
            InjectedForbidden { .. } => "Forbidden",
            Internal => "InternalError",
        }
    }

    /// The wire class of this error.
    pub fn class(&self) -> ErrorClass {
        use BrokerError::*;
        match self {
            MissingToken
            | InvalidToken { .. }
            | TokenExpired { .. }
            | TokenNotYetValid { .. }
            | InvalidAudience { .. }
            | InvalidIssuer { .. }
            | PrincipalDeleted { .. } => ErrorClass::Unauthenticated,
            AuthorizationFailed { .. }
            | AccessDenied { .. }
            | ForbiddenByRbac { .. }
            | ForbiddenByFirewall { .. }
            | ForbiddenByConnection { .. }
            | KeyDisabled { .. }
            | KeyOperationForbidden { .. }
            | KeyExpired { .. }
            | KeyNotYetValid { .. }
            | PurgeProtected
            | NotAServerHost { .. }
            | DisallowedByPolicy { .. } => ErrorClass::Forbidden,
            KeyNotFound { .. }
            | DeletedKeyNotFound { .. }
            | VaultNotFound { .. }
            | DeletedVaultNotFound { .. }
            | IdentityNotFound { .. }
            | RoleAssignmentNotFound { .. }
            | ServerNotFound { .. }
            | DatabaseNotFound { .. } => ErrorClass::NotFound,
            KeyAlreadyExists { .. }
            | VaultAlreadyExists { .. }
            | RoleAssignmentExists
            | ServerAlreadyExists { .. }
            | DatabaseAlreadyExists { .. } => ErrorClass::AlreadyExists,
            KeyDeletedButRecoverable { .. }
            | VaultDeletedButRecoverable { .. }
            | ClockNotManual
            | TdeVaultRecoveryLevel
            | TdeKeyNotSupported
            | TdeKeyDisabled { .. }
            | TdeKeyInvalidDates { .. }
            | TdeKeyNotFound { .. }
            | TdeManagedInstanceUmiNeedsOpenVault { .. }
            | TdeIdentityMissingPermissions { .. }
            | TdeUmiMissingPermissions { .. }
            | TdeFallbackIdentityMissingPermissions { .. }
            | TdeNoServerIdentity { .. }
            | IdentityInUse { .. }
            | DatabaseInaccessible { .. }
            | InaccessibleDatabaseBlocksChange { .. } => ErrorClass::FailedPrecondition,
            PurgeProtectionIrreversible
            | BadParameter { .. }
            | InvalidRotationPolicy(_)
            | DecryptionFailed
            | PrincipalNotFound { .. } => ErrorClass::InvalidArgument,
            StoreUnavailable | VaultUnavailable { .. } | ConcurrentChange | BrokerStale { .. } => {
                ErrorClass::Unavailable
            }
            Throttled { .. } | StoreFull => ErrorClass::ResourceExhausted,
            InjectedForbidden { .. } => ErrorClass::Forbidden,
            StoreCorrupt | Internal => ErrorClass::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_not_found_text_matches_the_cloud() {
        let e = BrokerError::KeyNotFound { name_or_id: "tde".into() };
        assert_eq!(
            e.to_string(),
            "A key with (name/id) tde was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
        );
        assert_eq!(e.code(), "KeyNotFound");
        assert_eq!(e.class(), ErrorClass::NotFound);
    }

    #[test]
    fn access_denied_text_names_caller_permission_and_vault() {
        let e = BrokerError::AccessDenied {
            caller: Box::new(CallerDescription {
                app_id: "a".into(),
                object_id: "o".into(),
                issuer: "https://sts.windows.net/t/".into(),
            }),
            permission: "unwrapKey",
            vault: "v1".into(),
            location: "westus".into(),
        };
        assert_eq!(
            e.to_string(),
            "The user, group or application 'appid=a;oid=o;iss=https://sts.windows.net/t/' does not have keys unwrapKey permission on key vault 'v1;location=westus'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287"
        );
        assert_eq!(e.code(), "AccessDenied");
    }

    #[test]
    fn a_damaged_store_is_an_internal_error_that_says_not_to_retry() {
        let e = BrokerError::StoreCorrupt;
        assert_eq!(e.class(), ErrorClass::Internal);
        assert_eq!(e.code(), "StoreCorrupt");
        let text = e.to_string();
        assert!(
            text.contains("damaged") && text.contains("restore") && !text.contains("Retry later"),
            "{text}"
        );
    }

    #[test]
    fn disabled_key_text_names_the_operation() {
        let e = BrokerError::KeyDisabled { operation: "unwrapKey" };
        assert_eq!(e.to_string(), "Operation unwrapKey is not allowed on a disabled key.");
        assert_eq!(e.class(), ErrorClass::Forbidden);
    }
}
