//! Building blocks every component's config is made of: sizes and durations, secrets that never
//! print, `${ENV}` interpolation, and errors that name `file:line:col`. The whole config file is
//! `app::config::Config`, above every component it configures.

mod error;
mod interpolate;
mod secret;
pub mod units;

pub use error::{ConfigError, key_offset, line_col, table_body, word_offset};
pub use interpolate::interpolate;
pub use secret::{Secret, redact_url};
pub use units::{ByteSize, duration_opt};
