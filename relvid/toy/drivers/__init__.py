"""The toy world's drivers: base pretraining, customization, exemplar caches, the demo, evaluation."""
