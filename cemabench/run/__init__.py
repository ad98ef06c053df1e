"""Running tables: what a unit needs and what keys its result (:mod:`.context`), the scheduler over the store
(:mod:`.runner`), where units execute (:mod:`.executors`: in process, local processes, Ray) and the results store
(:mod:`.store`)."""
