//! The `timeseries` sink: Timestream for LiveAnalytics (`WriteRecords`) and Timestream for
//! InfluxDB / InfluxDB (line protocol), from point mappings that emit zero, one or many points
//! per change.

pub mod action;
pub mod config;
pub mod influx;
pub mod lineproto;
pub mod timestream;

pub use action::{Measure, Point};
pub use config::{Engine, TimeseriesSinkConfig};
