//! The interactive installer: a state machine (`state`), its screens drawn with ratatui
//! (`render`), the bytes typed on a console as keys (`keys`), and the loop over the machine's
//! consoles, screen and serial (`terminal`).

pub mod keys;
pub mod render;
pub mod state;
pub mod terminal;

pub use state::{Action, Key, Screen, Wizard};
