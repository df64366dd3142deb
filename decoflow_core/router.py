"""Prototype-based task routing (Sec. 3.8): pick the task whose feature prototype is nearest."""
import torch
from sklearn.covariance import LedoitWolf


class PrototypeRouter:
    """One prototype per task: the mean of its images' global features and, for the Mahalanobis
    metric, the precision (Sigma + reg I)^-1, computed once when the task is added.

    shrinkage="ledoit_wolf" estimates Sigma with sklearn's LedoitWolf before adding reg I; use it
    when a task has fewer images than feature dimensions (N < G), where the sample covariance is
    singular. Prototypes are stored in `dtype` (float32 as counted in the paper's memory figure);
    distances are computed in float64.
    """

    def __init__(self, *, metric="mahalanobis", reg=1e-5, shrinkage=None, dtype=torch.float32):
        if metric not in ("mahalanobis", "euclidean"):
            raise ValueError(f"metric must be 'mahalanobis' or 'euclidean', got {metric!r}")
        if shrinkage not in (None, "ledoit_wolf"):
            raise ValueError(f"shrinkage must be None or 'ledoit_wolf', got {shrinkage!r}")
        self.metric, self.reg, self.shrinkage, self.dtype = metric, reg, shrinkage, dtype
        self.tasks, self.means, self.precisions = [], [], []

    def add_task(self, name, feats):
        """Store task `name`'s prototype from its normal training features (N, G)."""
        if name in self.tasks:
            raise ValueError(f"router already has task {name!r}")
        feats = torch.as_tensor(feats).detach().to("cpu", torch.float64)
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"features for {name!r} must be (N >= 2, G), got {tuple(feats.shape)}")
        self.tasks.append(name)
        self.means.append(feats.mean(dim=0).to(self.dtype))
        if self.metric == "mahalanobis":
            self.precisions.append(self._precision(feats).to(self.dtype))

    def _precision(self, feats):  # (N, G) float64 -> (G, G)
        if self.shrinkage == "ledoit_wolf":
            cov = torch.from_numpy(LedoitWolf().fit(feats.numpy()).covariance_)
        else:
            cov = torch.cov(feats.T)
        eye = torch.eye(feats.shape[1], dtype=torch.float64)
        return torch.linalg.inv(cov.reshape(eye.shape) + self.reg * eye)

    def distances(self, feats):
        """(B, G) features -> (B, T) distances to every task prototype, in task order."""
        if not self.tasks:
            raise RuntimeError("the router has no tasks yet; call add_task first")
        feats = torch.as_tensor(feats).detach().to("cpu", torch.float64)
        diff = feats[:, None, :] - torch.stack(self.means).double()[None]  # (B, T, G)
        if self.metric == "euclidean":
            return diff.norm(dim=-1)
        precision = torch.stack(self.precisions).double()  # (T, G, G)
        squared = torch.einsum("btg,tgh,bth->bt", diff, precision, diff)
        return squared.clamp_min(0).sqrt()

    def route(self, feats):
        """Name of the nearest task for each of the (B, G) features."""
        return [self.tasks[i] for i in self.distances(feats).argmin(dim=1).tolist()]

    def state_dict(self):
        return {"config": dict(metric=self.metric, reg=self.reg, shrinkage=self.shrinkage),
                "tasks": list(self.tasks), "means": [m.clone() for m in self.means],
                "precisions": [p.clone() for p in self.precisions]}

    def load_state_dict(self, state):
        self.metric, self.reg, self.shrinkage = (state["config"][k] for k in ("metric", "reg", "shrinkage"))
        self.tasks = list(state["tasks"])
        self.means = [m.clone() for m in state["means"]]
        self.precisions = [p.clone() for p in state["precisions"]]

    def memory_bytes(self):
        """Bytes held by the prototypes (means and precision matrices)."""
        return sum(t.numel() * t.element_size() for t in self.means + self.precisions)
