//! Where a request's tenant and token estimate come from.

mod estimate;
mod headers;
#[cfg(feature = "openai")]
pub(crate) mod json_scan;
#[cfg(feature = "openai")]
mod openai;
mod tenant;

pub use self::estimate::{EstimateError, Estimator, MissingEstimate};
#[cfg(feature = "openai")]
pub use self::openai::{OpenAiEstimate, OpenAiEstimator};
pub use self::tenant::{MissingTenant, TenantSource};

pub(crate) use self::estimate::{header_estimate, BodyEstimate, Estimated, Plan};
pub(crate) use self::headers::{find_pair, Found};
#[cfg(feature = "openai")]
pub(crate) use self::openai::json_model;
pub(crate) use self::tenant::header_tenant;
