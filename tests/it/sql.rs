//! See main.rs for the index.

#[allow(unused_imports)]
use crate::support::*;
