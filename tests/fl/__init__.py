"""Tests of the federated-learning pieces of the coordinator: templates, data, bundles."""
