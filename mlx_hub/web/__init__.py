"""HTTP faces of the hub: one app per model port (and, later, the controller)."""
