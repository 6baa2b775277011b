//! Stateless transformations of records: `split` (a line into words), `map` (set and select
//! fields), `filter` (comparisons) and `throttle` (a rate limit that holds records, not the
//! thread).

mod filter;
mod map;
mod split;
mod throttle;

pub use filter::Filter;
pub use map::Map;
pub use split::Split;
pub use throttle::Throttle;
