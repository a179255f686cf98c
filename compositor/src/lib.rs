//! Not started yet: DRM/KMS output, the home screen, present/hide and evdev routing land with the compositor issue.
