"""From a table's JSON document to what a person reads: Markdown leaderboards (:mod:`.leaderboard`), trade-off plots
and the Pareto front (:mod:`.plots`), sweep tables and plots (:mod:`.sweep`), and tolerance checks (:mod:`.check`)."""
