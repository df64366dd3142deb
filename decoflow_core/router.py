"""Prototype-based task routing (Sec. 3.8): pick the task whose feature prototype is nearest, and call
an image that lies outside every task's accepted distance ``unknown``."""
import torch

UNKNOWN = "unknown"


def residual_sums(residuals):
    """(X^T X, sum of ||x||^4, N) of residuals X (N, G): the sums Ledoit-Wolf needs, which add over samples."""
    return residuals.T @ residuals, residuals.pow(2).sum(dim=1).pow(2).sum(), len(residuals)


def ledoit_wolf(gram, fourth, n):
    """The Ledoit-Wolf covariance of N residuals from ``residual_sums`` (the estimate of sklearn's
    ``LedoitWolf(assume_centered=True)``): (1 - c) S + c mu I, S = X^T X / N, mu = trace(S) / G, with the
    shrinkage c = min(beta, delta) / delta, delta = (||X^T X||^2 / N^2 - G mu^2) / G and
    beta = (sum ||x||^4 / N - ||X^T X||^2 / N^2) / (G N)."""
    dims = gram.shape[0]
    emp = gram / n
    mu = torch.trace(emp) / dims
    squared = gram.pow(2).sum() / n ** 2
    delta = float((squared - dims * mu ** 2) / dims)
    beta = min(float((fourth / n - squared) / (dims * n)), delta)
    shrinkage = beta / delta if delta else 0.0  # delta 0: S is already mu I
    return (1 - shrinkage) * emp + shrinkage * mu * torch.eye(dims, dtype=emp.dtype)


class PrototypeRouter:
    """One prototype per task: the mean of its images' global features and, for the Mahalanobis
    metric, the precision (Sigma + reg I)^-1, computed once when the task is added.

    shrinkage="ledoit_wolf" estimates Sigma with sklearn's LedoitWolf before adding reg I; use it
    when a task has fewer images than feature dimensions (N < G), where the sample covariance is
    singular. Prototypes are stored in `dtype` (float32 as counted in the paper's memory figure);
    distances are computed in float64.

    A task of several classes has one prototype from all its images, or -- ``add_task(cls, feats,
    task=...)`` per class -- one per class, each mapped to its task: routing returns the task of the
    nearest prototype, ``nearest_prototypes`` the prototype itself.

    covariance="shared" (Mahalanobis with Ledoit-Wolf only) gives every prototype one precision instead:
    Ledoit-Wolf on the residuals of all prototypes' images, each about its own prototype's mean, as in
    linear discriminant analysis. That precision changes as prototypes arrive, so the router keeps each
    prototype's training features (G numbers per image) and refits the precision and every threshold
    when one is added.

    Each prototype also gets an acceptance threshold: the ``accept_quantile`` of its own training images'
    distances, each measured to a prototype fitted without it (``folds``-fold cross-fitting, so the
    threshold reflects unseen images of the task while the prototype still uses every image). An image
    farther than its nearest task's threshold is ``unknown`` (``route_or_unknown``).
    """

    def __init__(self, *, metric="mahalanobis", reg=1e-5, shrinkage=None, covariance="task", dtype=torch.float32,
                 accept_quantile=0.99, folds=5):
        if metric not in ("mahalanobis", "euclidean"):
            raise ValueError(f"metric must be 'mahalanobis' or 'euclidean', got {metric!r}")
        if shrinkage not in (None, "ledoit_wolf"):
            raise ValueError(f"shrinkage must be None or 'ledoit_wolf', got {shrinkage!r}")
        if covariance not in ("task", "shared"):
            raise ValueError(f"covariance must be 'task' or 'shared', got {covariance!r}")
        if covariance == "shared" and (metric, shrinkage) != ("mahalanobis", "ledoit_wolf"):
            raise ValueError("a shared covariance needs metric 'mahalanobis' with shrinkage 'ledoit_wolf'")
        self.metric, self.reg, self.shrinkage, self.covariance = metric, reg, shrinkage, covariance
        self.dtype, self.accept_quantile, self.folds = dtype, accept_quantile, folds
        self.tasks, self.means, self.precisions, self.thresholds = [], [], [], []
        self.owners = []  # the task of each prototype (its own name for a task's prototype)
        self.features = []  # shared covariance: each prototype's training features
        self.shared_precision = None

    def add_task(self, name, feats, *, task=None):
        """Store prototype ``name`` from its normal training features (N, G); it routes to ``task``
        (default: ``name`` itself)."""
        if name in self.tasks:
            raise ValueError(f"router already has task {name!r}")
        feats = torch.as_tensor(feats).detach().to("cpu", torch.float64)
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"features for {name!r} must be (N >= 2, G), got {tuple(feats.shape)}")
        self.tasks.append(name)
        self.owners.append(name if task is None else task)
        self.means.append(feats.mean(dim=0).to(self.dtype))
        if self.covariance == "shared":
            self.features.append(feats.to(self.dtype))
            self._refit_shared()
            return
        if self.metric == "mahalanobis":
            self.precisions.append(self._precision(feats).to(self.dtype))
        self.thresholds.append(self._threshold(feats))

    def _precision(self, feats):  # (N, G) float64 -> (G, G)
        if self.shrinkage == "ledoit_wolf":
            return self._inverse(ledoit_wolf(*residual_sums(feats - feats.mean(dim=0))))
        return self._inverse(torch.cov(feats.T).reshape(feats.shape[1], feats.shape[1]))

    def _inverse(self, cov):
        return torch.linalg.inv(cov + self.reg * torch.eye(cov.shape[0], dtype=torch.float64))

    @property
    def thresholds(self):
        """Each prototype's acceptance threshold (None: accepts everything). With a shared covariance they
        are refitted when first needed after prototypes arrive, not at every ``add_task``."""
        if self._thresholds is None:
            self._thresholds = self._shared_thresholds()
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value):
        self._thresholds = value

    def _shared_sums(self):
        """(each prototype's features in float64, their residual sums, the sums over all prototypes)."""
        feats = [f.double() for f in self.features]
        sums = [residual_sums(f - f.mean(dim=0)) for f in feats]
        return feats, sums, [sum(parts) for parts in zip(*sums)]

    def _refit_shared(self):
        """The shared precision from every prototype's residuals; every threshold is stale."""
        _, _, total = self._shared_sums()
        self.shared_precision = self._inverse(ledoit_wolf(*total)).to(self.dtype)
        self._thresholds = None

    def _shared_thresholds(self):
        """Each fold of a prototype's images measured against the mean of the rest, under the precision of
        the other prototypes' residuals and the rest's."""
        feats, sums, total = self._shared_sums()
        thresholds = []
        for own, mine in zip(feats, sums):
            others = [t - m for t, m in zip(total, mine)]
            thresholds.append(self._threshold(own, lambda rest: self._inverse(ledoit_wolf(*(
                o + r for o, r in zip(others, residual_sums(rest - rest.mean(dim=0))))))))
        return thresholds

    def _distance(self, feats, mean, precision):  # (B, G), (G,), (G, G) or None -> (B,)
        diff = feats - mean
        if precision is None:
            return diff.norm(dim=-1)
        return torch.einsum("bg,gh,bh->b", diff, precision, diff).clamp_min(0).sqrt()

    def _threshold(self, feats, precision_of=None) -> float | None:
        """The accept_quantile of out-of-fold distances (None with fewer than 2 images per fold);
        ``precision_of(rest)``: the precision a fold is measured under (default: the rest's own)."""
        n = len(feats)
        folds = min(self.folds, n // 2)
        if folds < 2:
            return None
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        held_out = []
        for k in range(folds):
            held, rest = order[k::folds], torch.cat([order[j::folds] for j in range(folds) if j != k])
            precision = None
            if self.metric == "mahalanobis":
                precision = (precision_of or self._precision)(feats[rest])
            held_out.append(self._distance(feats[held], feats[rest].mean(dim=0), precision))
        return float(torch.quantile(torch.cat(held_out), self.accept_quantile))

    def distances(self, feats):
        """(B, G) features -> (B, T) distances to every task prototype, in task order."""
        if not self.tasks:
            raise RuntimeError("the router has no tasks yet; call add_task first")
        feats = torch.as_tensor(feats).detach().to("cpu", torch.float64)
        diff = feats[:, None, :] - torch.stack(self.means).double()[None]  # (B, T, G)
        if self.metric == "euclidean":
            return diff.norm(dim=-1)
        if self.covariance == "shared":
            squared = torch.einsum("btg,gh,bth->bt", diff, self.shared_precision.double(), diff)
            return squared.clamp_min(0).sqrt()
        precision = torch.stack(self.precisions).double()  # (T, G, G)
        squared = torch.einsum("btg,tgh,bth->bt", diff, precision, diff)
        return squared.clamp_min(0).sqrt()

    def nearest_prototypes(self, feats):
        """Name of the nearest prototype for each of the (B, G) features."""
        return [self.tasks[i] for i in self.distances(feats).argmin(dim=1).tolist()]

    def owner(self, prototype: str) -> str:
        """The task a prototype routes to."""
        return self.owners[self.tasks.index(prototype)]

    def route(self, feats):
        """The task of the nearest prototype for each of the (B, G) features."""
        return [self.owners[i] for i in self.distances(feats).argmin(dim=1).tolist()]

    def route_or_unknown(self, feats) -> list[dict]:
        """Per image: ``task`` (the nearest, or UNKNOWN beyond its threshold), ``nearest``, ``distance``."""
        distances = self.distances(feats)
        nearest, index = distances.min(dim=1)
        out = []
        for d, i in zip(nearest.tolist(), index.tolist()):
            limit = self.thresholds[i] if i < len(self.thresholds) else None
            known = limit is None or d <= limit
            out.append({"task": self.owners[i] if known else UNKNOWN, "nearest": self.owners[i], "distance": d})
        return out

    def state_dict(self):
        return {"config": dict(metric=self.metric, reg=self.reg, shrinkage=self.shrinkage, covariance=self.covariance,
                               accept_quantile=self.accept_quantile, folds=self.folds),
                "tasks": list(self.tasks), "owners": list(self.owners), "means": [m.clone() for m in self.means],
                "precisions": [p.clone() for p in self.precisions], "thresholds": list(self.thresholds),
                "features": [f.clone() for f in self.features],
                "shared_precision": None if self.shared_precision is None else self.shared_precision.clone()}

    def load_state_dict(self, state):
        config = state["config"]
        self.metric, self.reg, self.shrinkage = (config[k] for k in ("metric", "reg", "shrinkage"))
        self.covariance = config.get("covariance", "task")
        self.accept_quantile = config.get("accept_quantile", self.accept_quantile)
        self.tasks = list(state["tasks"])
        self.owners = list(state.get("owners") or self.tasks)
        self.means = [m.clone() for m in state["means"]]
        self.precisions = [p.clone() for p in state["precisions"]]
        self.thresholds = list(state.get("thresholds") or [None] * len(self.tasks))  # older runs: never unknown
        self.features = [f.clone() for f in state.get("features") or []]
        shared = state.get("shared_precision")
        self.shared_precision = None if shared is None else shared.clone()

    def memory_bytes(self):
        """Bytes held by the prototypes (means, precision matrices and, with a shared covariance, the
        training features it is refitted from)."""
        shared = [] if self.shared_precision is None else [self.shared_precision]
        return sum(t.numel() * t.element_size() for t in self.means + self.precisions + self.features + shared)
