"""Files: upload, storage, retrieval and format detection of training data."""
