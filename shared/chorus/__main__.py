from chorus.cli.main import main

raise SystemExit(main())
