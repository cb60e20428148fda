"""datamodules of the replication suite."""
