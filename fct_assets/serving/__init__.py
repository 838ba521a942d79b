"""What is served: the deployment record, promotion, rollback and search."""
