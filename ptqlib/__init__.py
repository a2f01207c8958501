"""ptqlib."""
