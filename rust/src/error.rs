//! Errors of the pure Rust core; the binding layer maps them to Python exceptions.
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum Error {
    /// Bad user input: a wrong argument, a malformed file, an id out of range.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for an [`Error::Invalid`] with a formatted message.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => {
        $crate::error::Error::Invalid(format!($($arg)*))
    };
}

/// The error for an argument outside its range, worded for Python users.
pub fn out_of_range(
    name: &str,
    lo: impl std::fmt::Display,
    hi: impl std::fmt::Display,
    got: impl std::fmt::Display,
) -> Error {
    Error::Invalid(format!(
        "{name} must be an integer from {lo} to {hi}, got {got}"
    ))
}
