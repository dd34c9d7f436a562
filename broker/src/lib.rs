//! The bundled MQTT broker and its cluster layer. Not built yet: this crate
//! is reserved so the workspace layout is stable. Until it exists, run mqlb
//! in front of any broker (see the README).
