//! Token endpoints: the App Service and IMDS managed-identity protocols and an OpenID authority
//! with client credentials for service principals.
