from shardstack.cli import main

raise SystemExit(main())
