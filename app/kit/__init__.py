"""Small helpers shared by every domain: errors, ids, time, JSON, pagination, HTTP plumbing."""
