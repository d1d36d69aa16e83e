"""Background work: every loop claims due rows with SKIP LOCKED + a lease (see ARCHITECTURE.md)."""
