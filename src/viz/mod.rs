//! Plots and overlays drawn without a plotting library (self-contained 5×7 font).

pub mod canvas;
pub mod curves;
pub mod font;
pub mod plots;
