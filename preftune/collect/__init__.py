"""Collecting preferences from people: candidates -> labelling app -> agreement -> training data.

* :mod:`~preftune.collect.candidates` — read a candidates file (a prompt and 1+ responses per line)
  into labelling tasks, every bad line a clear ``file:line`` error;
* :mod:`~preftune.collect.store` — the SQLite (WAL) store of tasks, assignments and labels;
* :mod:`~preftune.collect.server` — the local web app (FastAPI + uvicorn; ``page.html`` / ``page.js``);
* :mod:`~preftune.collect.agreement` — labels per annotator, time, agreement (raw, Cohen's kappa,
  Krippendorff's alpha), position and length bias;
* :mod:`~preftune.collect.export` — majority vote per task -> pairs, KTO rows or rankings;
* :mod:`~preftune.data.ratings` — scored or rated responses (UltraFeedback, CSAT, thumbs logs)
  -> pairs or KTO rows, without people.

Nothing here imports the training stack: the app starts without torch.
"""
