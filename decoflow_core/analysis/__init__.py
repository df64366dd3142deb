"""What the numbered notebooks share, above the method: the run cache (``runs``), a notebook's
context with its figure, table and record helpers (``context``, ``plots``), result tables
(``results``), and one module per paper analysis (``galleries``, ``feature_probes``, ``svd``,
``gradients``, ``routing``, ``ablation``, ``acl``, ``cost``). ``pipeline`` runs every notebook.
Nothing in the method imports this package."""
