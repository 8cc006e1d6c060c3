"""The paper's explainability analyses (Q/K/V subspaces, Q/K/V features, relation-word attention) and
adapter attribution, as run by `relvid analyze` (docs/analysis.md)."""
