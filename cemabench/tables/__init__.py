"""Tables as data: a table spec (:mod:`.spec`, TOML with ``extends``), its run units and their dependencies
(:mod:`.plan`), and sweeps over a method's options expanded into tables (:mod:`.sweep`). Nothing here runs a unit."""
