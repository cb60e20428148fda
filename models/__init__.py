"""models of the replication suite."""
