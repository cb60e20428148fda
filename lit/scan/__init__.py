"""``lit scan``: audit a generator's images against its training set (the paper's Sec. 6-7).

- :mod:`lit.scan.command`: the command (options, inputs, search, outputs);
- :mod:`lit.scan.sources`: generations, training and background sets as feature stores or in memory;
- :mod:`lit.scan.analysis`: the statistics as pure functions (rates, baseline, duplicates, per class);
- :mod:`lit.scan.report`: the plots and the self-contained ``report.html``;
- :mod:`lit.scan.demo`: planted copies among procedural generations (``python -m lit.scan.demo``).
"""
