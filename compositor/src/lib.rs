//! rayos-compositor: the RayOS screen. DRM/KMS output, the home screen, presenting a VM's
//! framebuffer, and routing keyboard and pointer input to the presented VM only.

pub mod app;
pub mod canvas;
pub mod channel;
pub mod clock;
pub mod devices;
pub mod font;
pub mod home;
pub mod output;
pub mod present;
pub mod route;
