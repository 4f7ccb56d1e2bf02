//! Real NVP normalizing flows on candle: the umbrella crate.
pub use nvp_data as data;
pub use nvp_flow as flow;
