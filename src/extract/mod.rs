//! Where a request's tenant and token estimate come from.

mod estimate;
#[cfg(feature = "openai")]
mod openai;
mod tenant;

pub use self::estimate::{EstimateError, Estimator, MissingEstimate};
#[cfg(feature = "openai")]
pub use self::openai::{OpenAiEstimate, OpenAiEstimator};
pub use self::tenant::{MissingTenant, TenantSource, DEFAULT_MAX_TENANT_LEN};

pub(crate) use self::estimate::{BodyEstimate, Plan};
#[cfg(feature = "openai")]
pub(crate) use self::openai::json_model;
