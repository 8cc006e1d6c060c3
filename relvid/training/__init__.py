"""Training: the RelationModule (one step), the run assembly, strategies and callbacks."""
