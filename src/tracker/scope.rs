//! Who a reservation is charged to.

/// The tenant a request is charged to, and optionally the user within it.
///
/// The tracker keys its ledger by [`tenant_id`](Self::tenant_id) alone: every user of a tenant
/// draws from the same cap. The user id travels along for logging and for handlers that want
/// it. An auth layer can insert a `TenantScope` into the request extensions for
/// [`TenantSource::extension`](crate::TenantSource::extension) to pick up.
///
/// ```
/// use tower_tenant_tokens::TenantScope;
///
/// let scope = TenantScope::new("acme").with_user("alice");
/// assert_eq!(scope.tenant_id, "acme");
/// assert_eq!(scope.user_id.as_deref(), Some("alice"));
/// ```
#[derive(Debug, Default, Clone, PartialEq, Eq, Hash)]
pub struct TenantScope {
    /// The tenant (who pays). Reservations are counted against this id's cap.
    pub tenant_id: String,
    /// The user inside the tenant, if known. Not used for accounting.
    pub user_id: Option<String>,
}

impl TenantScope {
    /// A scope for `tenant_id` with no user.
    pub fn new(tenant_id: impl Into<String>) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            user_id: None,
        }
    }

    /// The same scope, naming the user within the tenant.
    pub fn with_user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }
}
