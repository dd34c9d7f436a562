//! MQTT-level health checks (placeholder, filled in below).
