"""The built-in cloud-edge methods, registered through the ``cemabench.methods`` entry-point group."""
