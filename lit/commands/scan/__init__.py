"""``lit scan``: audit a generator's images against its training set (the paper's Sec. 6-7).

- :mod:`lit.commands.scan.options`: the command line's options, parsed and checked without torch (``--help``);
- :mod:`lit.commands.scan.command`: the scan of parsed options (descriptor, inputs) that runs the rest;
- :mod:`lit.commands.scan.types`: the scan's options and result records;
- :mod:`lit.commands.scan.engine`: the search, baseline, duplicate and class analyses over feature sources;
- :mod:`lit.commands.scan.outputs`: the claimed ``--out`` folder, ``matches.csv`` and ``summary.json``;
- :mod:`lit.commands.scan.approx`: approximate search through a faiss index beside the training store;
- :mod:`lit.commands.scan.sources`: generations, training and background sets as feature stores or in memory;
- :mod:`lit.commands.scan.analysis`: the scan-specific analyses as pure functions (per class, SSCD normalisation;
  the replication statistics themselves are :mod:`lit.replication`'s, shared with the monitor);
- :mod:`lit.commands.scan.mirror`: the mirrored training set of ``--match_mirrors``;
- :mod:`lit.commands.scan.report`: the plots and the self-contained ``report.html``;
- :mod:`lit.commands.scan.demo`: planted copies among procedural generations (``python -m lit.commands.scan.demo``).
"""
