"""Projects: the tenants every other object belongs to."""
