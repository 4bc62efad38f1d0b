"""Deployment manifests generated from the serve configs (kuberay/: a RayService for the GPU profile)."""
