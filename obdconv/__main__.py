from obdconv.cli.main import main

raise SystemExit(main())
