"""KubeRay RayService of the GPU profile: `python -m deploy.kuberay.render > deploy/kuberay/rayservice-gpu.yaml`."""
