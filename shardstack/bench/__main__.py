"""`python -m shardstack.bench` = `shardstack bench`."""

from shardstack.bench import main

raise SystemExit(main())
