"""ptuning's library: templates, prompt encoder, models, training, tasks, metrics, search and tracking.
It never imports Prefect; flows/ chains these pieces."""
