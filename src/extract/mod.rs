//! Where a request's tenant and token estimate come from.

mod estimate;
mod head;
mod headers;
#[cfg(feature = "openai")]
pub(crate) mod openai;
#[cfg(not(feature = "openai"))]
#[path = "openai_off.rs"]
pub(crate) mod openai;
mod priority;
mod tenant;
mod words;

pub use self::estimate::{EstimateError, Estimator, MissingEstimate};
pub use self::priority::PrioritySource;
pub use self::tenant::{MissingTenant, TenantSource};

pub(crate) use self::estimate::{header_estimate, BodyEstimate, Estimate, Estimated};
pub(crate) use self::head::Head;
pub(crate) use self::headers::find_pair;
pub(crate) use self::tenant::header_tenant;
