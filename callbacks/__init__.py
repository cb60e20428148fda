"""callbacks of the replication suite."""
