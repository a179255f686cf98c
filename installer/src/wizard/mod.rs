//! The interactive installer: a state machine (`state`), its screens drawn with ratatui
//! (`render`), and the terminal loop over /dev/console (`terminal`).

pub mod render;
pub mod state;
pub mod terminal;

pub use state::{Action, Key, Screen, Wizard};
