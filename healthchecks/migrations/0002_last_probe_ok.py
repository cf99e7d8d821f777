from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("healthchecks", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="endpoint",
            name="last_http_ok_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name="endpoint",
            name="last_ping_ok_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
    ]
